//! Which bytes of a file a GET answers with (RFC 9110 §14 and §13.1.5).
//!
//! [`plan`] turns the request's `Range` and `If-Range` headers and the
//! file's length and validators into a [`BodyPlan`]: the whole file (200),
//! one range (206 with `Content-Range`), several ranges (206
//! `multipart/byteranges`, laid out by [`Multipart`] so that
//! `Content-Length` is known before the first byte, which iPXE relies on),
//! or nothing satisfiable (416 with `Content-Range: bytes */len`).
//!
//! Parsing the header is the `http-range-header` crate's job; what is
//! decided here is policy:
//! * a syntactically invalid or ignorable header is ignored (a 200), as
//!   RFC 9110 §14.2 allows;
//! * overlapping or excessive ranges are ignored too, rather than serving an
//!   amplified body;
//! * `If-Range` applies the range only when its validator matches: a strong
//!   entity tag equal to ours (weak tags never match), or an HTTP date equal
//!   to our `Last-Modified`.

use std::ops::RangeInclusive;

use http_range_header::RangeUnsatisfiableError;

/// What to send for a GET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyPlan {
    /// 200: the whole file.
    Full,
    /// 206: one range, with `Content-Range: bytes first-last/len`.
    Single(RangeInclusive<u64>),
    /// 206: several ranges as `multipart/byteranges`.
    Multiple(Vec<RangeInclusive<u64>>),
    /// 416: with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// The file's validators, as sent in `ETag` and `Last-Modified`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validators<'a> {
    /// A strong entity tag, quotes included: `"ino-size-mtime"`.
    pub etag: &'a str,
    /// An IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
    pub last_modified: &'a str,
}

/// Plans the response body of a GET for a file of `len` bytes.
pub fn plan(
    range: Option<&str>,
    if_range: Option<&str>,
    len: u64,
    validators: Validators<'_>,
) -> BodyPlan {
    let Some(range) = range else {
        return BodyPlan::Full;
    };
    if let Some(condition) = if_range {
        if !if_range_matches(condition.trim(), validators) {
            return BodyPlan::Full;
        }
    }
    let parsed = match http_range_header::parse_range_header(range.trim()) {
        Ok(parsed) => parsed,
        Err(RangeUnsatisfiableError::Unsatisfiable) => return BodyPlan::Unsatisfiable,
        Err(_) => return BodyPlan::Full,
    };
    match parsed.validate(len) {
        Ok(ranges) if ranges.is_empty() => BodyPlan::Full,
        Ok(mut ranges) if ranges.len() == 1 => BodyPlan::Single(ranges.remove(0)),
        Ok(ranges) if overlapping(&ranges) => BodyPlan::Full,
        Ok(ranges) => BodyPlan::Multiple(ranges),
        Err(RangeUnsatisfiableError::Unsatisfiable) => BodyPlan::Unsatisfiable,
        Err(_) => BodyPlan::Full,
    }
}

/// Whether any two ranges share a byte (the crate tolerates a few).
fn overlapping(ranges: &[RangeInclusive<u64>]) -> bool {
    let mut sorted: Vec<&RangeInclusive<u64>> = ranges.iter().collect();
    sorted.sort_by_key(|r| *r.start());
    sorted
        .windows(2)
        .any(|pair| pair[1].start() <= pair[0].end())
}

fn if_range_matches(condition: &str, validators: Validators<'_>) -> bool {
    if condition.starts_with("W/") {
        return false; // weak tags never satisfy If-Range (RFC 9110 §13.1.5)
    }
    if condition.starts_with('"') {
        return condition == validators.etag;
    }
    condition == validators.last_modified
}

/// `bytes first-last/len`.
pub fn content_range(range: &RangeInclusive<u64>, len: u64) -> String {
    format!("bytes {}-{}/{len}", range.start(), range.end())
}

/// `bytes */len`, for a 416.
pub fn unsatisfied_range(len: u64) -> String {
    format!("bytes */{len}")
}

/// The layout of a `multipart/byteranges` body (RFC 9110 §14.6): before
/// each range its part header, after the last one the closing delimiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Multipart {
    /// The value of the response's `Content-Type`.
    pub content_type: String,
    /// For each range, the bytes to send before it.
    pub parts: Vec<(String, RangeInclusive<u64>)>,
    /// The bytes to send after the last range.
    pub closing: String,
    /// The whole body's length: the response's `Content-Length`.
    pub content_length: u64,
}

impl Multipart {
    /// Lays out `ranges` of a file of `len` bytes whose own type is
    /// `file_type`, separated by `boundary` (which must not occur in the
    /// file; a random 64-bit value in hex is the usual choice).
    pub fn new(ranges: &[RangeInclusive<u64>], len: u64, file_type: &str, boundary: &str) -> Self {
        let mut content_length = 0u64;
        let parts: Vec<(String, RangeInclusive<u64>)> = ranges
            .iter()
            .map(|range| {
                let header = format!(
                    "\r\n--{boundary}\r\nContent-Type: {file_type}\r\nContent-Range: {}\r\n\r\n",
                    content_range(range, len)
                );
                content_length += header.len() as u64 + (range.end() - range.start() + 1);
                (header, range.clone())
            })
            .collect();
        let closing = format!("\r\n--{boundary}--\r\n");
        content_length += closing.len() as u64;
        Self {
            content_type: format!("multipart/byteranges; boundary={boundary}"),
            parts,
            closing,
            content_length,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const V: Validators<'static> = Validators {
        etag: "\"42-1000-7\"",
        last_modified: "Wed, 25 Nov 2026 03:00:00 GMT",
    };

    #[test]
    fn no_range_single_suffix_and_open_ranges() {
        assert_eq!(plan(None, None, 1000, V), BodyPlan::Full);
        assert_eq!(
            plan(Some("bytes=0-99"), None, 1000, V),
            BodyPlan::Single(0..=99)
        );
        assert_eq!(
            plan(Some("bytes=-100"), None, 1000, V),
            BodyPlan::Single(900..=999)
        );
        assert_eq!(
            plan(Some("bytes=900-"), None, 1000, V),
            BodyPlan::Single(900..=999)
        );
        // A range past the end is clipped to it.
        assert_eq!(
            plan(Some("bytes=900-5000"), None, 1000, V),
            BodyPlan::Single(900..=999)
        );
        assert_eq!(
            plan(Some("bytes=0-0,-1"), None, 1000, V),
            BodyPlan::Multiple(vec![0..=0, 999..=999])
        );
    }

    #[test]
    fn unsatisfiable_and_ignored_ranges() {
        assert_eq!(
            plan(Some("bytes=1000-"), None, 1000, V),
            BodyPlan::Unsatisfiable
        );
        assert_eq!(
            plan(Some("bytes=5000-6000"), None, 1000, V),
            BodyPlan::Unsatisfiable
        );
        // Syntax errors and other units are ignored: the whole file.
        for ignored in ["bytes=abc", "items=0-1", "bytes=5-1", "bytes=", "bytes 0-1"] {
            assert_eq!(
                plan(Some(ignored), None, 1000, V),
                BodyPlan::Full,
                "{ignored}"
            );
        }
        // Overlapping ranges are not served piecemeal.
        assert_eq!(
            plan(Some("bytes=0-500,100-600"), None, 1000, V),
            BodyPlan::Full
        );
        // An empty file: only a non-zero suffix is satisfiable, and it
        // selects nothing, so the whole (empty) file (RFC 9110 §14.1.2).
        assert_eq!(plan(Some("bytes=0-"), None, 0, V), BodyPlan::Unsatisfiable);
        assert_eq!(plan(Some("bytes=-5"), None, 0, V), BodyPlan::Full);
    }

    #[test]
    fn if_range_needs_a_strong_match() {
        let r = Some("bytes=0-9");
        assert_eq!(
            plan(r, Some("\"42-1000-7\""), 1000, V),
            BodyPlan::Single(0..=9)
        );
        assert_eq!(plan(r, Some("\"other\""), 1000, V), BodyPlan::Full);
        assert_eq!(plan(r, Some("W/\"42-1000-7\""), 1000, V), BodyPlan::Full);
        assert_eq!(
            plan(r, Some("Wed, 25 Nov 2026 03:00:00 GMT"), 1000, V),
            BodyPlan::Single(0..=9)
        );
        assert_eq!(
            plan(r, Some("Wed, 25 Nov 2026 03:00:01 GMT"), 1000, V),
            BodyPlan::Full
        );
    }

    #[test]
    fn headers_and_multipart_layout() {
        assert_eq!(content_range(&(0..=99), 1000), "bytes 0-99/1000");
        assert_eq!(unsatisfied_range(1000), "bytes */1000");
        let m = Multipart::new(
            &[0..=1, 998..=999],
            1000,
            "application/octet-stream",
            "b0undary",
        );
        assert_eq!(m.content_type, "multipart/byteranges; boundary=b0undary");
        assert_eq!(
            m.parts[0].0,
            "\r\n--b0undary\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-1/1000\r\n\r\n"
        );
        assert_eq!(m.closing, "\r\n--b0undary--\r\n");
        let body: u64 = m
            .parts
            .iter()
            .map(|(h, r)| h.len() as u64 + (r.end() - r.start() + 1))
            .sum::<u64>()
            + m.closing.len() as u64;
        assert_eq!(m.content_length, body);
    }

    proptest! {
        #[test]
        fn planned_ranges_always_lie_inside_the_file(header in "[ -~]{0,40}", len in 0u64..10_000) {
            match plan(Some(&header), None, len, V) {
                BodyPlan::Single(r) => prop_assert!(r.start() <= r.end() && *r.end() < len),
                BodyPlan::Multiple(rs) => {
                    for r in rs {
                        prop_assert!(r.start() <= r.end() && *r.end() < len);
                    }
                }
                BodyPlan::Full | BodyPlan::Unsatisfiable => {}
            }
        }

        #[test]
        fn numeric_ranges_plan_as_expected(len in 1u64..1_000_000, a in 0u64..2_000_000, b in 0u64..2_000_000) {
            let (first, last) = (a.min(b), a.max(b));
            let planned = plan(Some(&format!("bytes={first}-{last}")), None, len, V);
            if first >= len {
                prop_assert_eq!(planned, BodyPlan::Unsatisfiable);
            } else {
                prop_assert_eq!(planned, BodyPlan::Single(first..=last.min(len - 1)));
            }
        }
    }
}
