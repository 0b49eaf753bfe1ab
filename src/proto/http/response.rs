//! HTTP response framing and conditionals, sans-I/O: the structured
//! response head and its encoding, the status line's reason phrase, the
//! content type of a boot file, and RFC 9110's conditional requests
//! (`If-None-Match`, `If-Modified-Since`). The service that builds
//! responses is [`crate::server::http`].

use std::time::{SystemTime, UNIX_EPOCH};

pub use super::range::Validators;
use super::request::Request;

/// RFC 9110 §13.1.2 and §13.1.3, evaluated as §13.2.2 orders them.
pub fn not_modified(request: &Request, etag: &str, mtime: SystemTime) -> bool {
    if let Some(list) = &request.if_none_match {
        let ours = etag.trim_start_matches("W/");
        return list
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag.trim_start_matches("W/") == ours);
    }
    if let Some(since) = request
        .if_modified_since
        .as_deref()
        .and_then(|d| httpdate::parse_http_date(d).ok())
    {
        let mtime_secs = mtime.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let since_secs = since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        return mtime_secs <= since_secs;
    }
    false
}

/// A response's head, structured: the status and every header bootfleet
/// sends, each a typed field, written out in one place
/// ([`ResponseHead::write_to`]) in a fixed order. The service fills it in;
/// nothing else writes header lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead<'a> {
    pub status: u16,
    /// `Connection: keep-alive`, or `close`.
    pub keep_alive: bool,
    /// The `Server` header's value.
    pub server: &'a str,
    /// The `Date` header's value (the caller's clock: this module reads
    /// none).
    pub date: &'a str,
    pub content_type: Option<&'a str>,
    /// `Cache-Control: no-store`, for generated responses.
    pub no_store: bool,
    /// The `Allow` header of a 405.
    pub allow: Option<&'a str>,
    pub content_range: Option<&'a str>,
    /// A file's `ETag` and `Last-Modified`; with them `Accept-Ranges: bytes`.
    pub validators: Option<Validators<'a>>,
    pub retry_after_seconds: Option<u32>,
    /// `None` for a 304, which has none.
    pub content_length: Option<u64>,
}

impl<'a> ResponseHead<'a> {
    /// A head with only its status line and the headers every response has.
    pub fn new(status: u16, keep_alive: bool, server: &'a str) -> Self {
        Self {
            status,
            keep_alive,
            server,
            date: "",
            content_type: None,
            no_store: false,
            allow: None,
            content_range: None,
            validators: None,
            retry_after_seconds: None,
            content_length: Some(0),
        }
    }

    /// Appends the head, ending with its blank line, to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        // Written in place, without the formatting machinery: this runs for
        // every response.
        let mut number = itoa::Buffer::new();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(number.format(self.status).as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason(self.status).as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut line = |name: &[u8], value: &[u8]| {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        line(b"Server", self.server.as_bytes());
        line(b"Date", self.date.as_bytes());
        let connection: &[u8] = if self.keep_alive {
            b"keep-alive"
        } else {
            b"close"
        };
        line(b"Connection", connection);
        if let Some(allow) = self.allow {
            line(b"Allow", allow.as_bytes());
        }
        if let Some(content_type) = self.content_type {
            line(b"Content-Type", content_type.as_bytes());
        }
        if self.no_store {
            line(b"Cache-Control", b"no-store");
        }
        if let Some(range) = self.content_range {
            line(b"Content-Range", range.as_bytes());
        }
        if let Some(validators) = self.validators {
            line(b"ETag", validators.etag.as_bytes());
            line(b"Last-Modified", validators.last_modified.as_bytes());
            line(b"Accept-Ranges", b"bytes");
        }
        if let Some(seconds) = self.retry_after_seconds {
            line(b"Retry-After", number.format(seconds).as_bytes());
        }
        if let Some(length) = self.content_length {
            line(b"Content-Length", number.format(length).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// The reason phrase of `status`.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// The content type for a boot-directory file, by extension.
pub fn content_type(name: &str) -> &'static str {
    let extension = name
        .rsplit('/')
        .next()
        .and_then(|n| n.rsplit_once('.'))
        .map(|(_, e)| e.to_ascii_lowercase());
    match extension.as_deref() {
        Some("ipxe" | "gpxe" | "txt" | "cfg" | "conf" | "cmdline") => "text/plain; charset=utf-8",
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("json") => "application/json",
        Some("iso") => "application/x-iso9660-image",
        Some("gz" | "tgz") => "application/gzip",
        Some("xz") => "application/x-xz",
        Some("zst") => "application/zstd",
        Some("tar") => "application/x-tar",
        Some("img" | "efi" | "kpxe" | "pxe" | "0" | "cpio" | "squashfs" | "sfs") => {
            "application/octet-stream"
        }
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_wins_over_if_modified_since_and_weak_tags_match() {
        use crate::proto::http::request::{parse, Parsed};
        let mtime = UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let date = httpdate::fmt_http_date(mtime);
        let request = |if_none_match: &str| {
            let head = format!(
                "GET /k HTTP/1.1\r\nHost: x\r\n{if_none_match}If-Modified-Since: {date}\r\n\r\n"
            );
            match parse(head.as_bytes(), 8192) {
                Parsed::Complete(request, _) => request,
                _ => panic!("a valid head"),
            }
        };
        let both = request("If-None-Match: W/\"abc\", \"def\"\r\n");
        assert!(not_modified(&both, "\"abc\"", mtime));
        // A tag that differs: modified, whatever the date says (§13.2.2).
        assert!(!not_modified(&both, "\"xyz\"", mtime));
        let date_only = request("");
        assert!(not_modified(&date_only, "\"xyz\"", mtime));
        let later = mtime + std::time::Duration::from_secs(1);
        assert!(!not_modified(&date_only, "\"xyz\"", later));
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type("a/b.IPXE"), "text/plain; charset=utf-8");
        assert_eq!(content_type("x.iso"), "application/x-iso9660-image");
        assert_eq!(content_type("vmlinuz"), "application/octet-stream");
        assert_eq!(content_type("dir.d/vmlinuz"), "application/octet-stream");
    }

    #[test]
    fn a_head_is_written_as_httparse_reads_it() {
        let mut head = ResponseHead::new(206, true, "bootfleet/1");
        head.date = "Mon, 07 Dec 2026 10:00:00 GMT";
        head.content_type = Some("application/octet-stream");
        head.content_range = Some("bytes 0-9/100");
        head.validators = Some(Validators {
            etag: "\"1-64-2\"",
            last_modified: "Sun, 06 Dec 2026 10:00:00 GMT",
        });
        head.retry_after_seconds = Some(1);
        head.content_length = Some(10);
        let mut out = b"leading".to_vec();
        head.write_to(&mut out);
        let written = &out[b"leading".len()..];
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut parsed = httparse::Response::new(&mut headers);
        let end = match parsed.parse(written).expect("a valid head") {
            httparse::Status::Complete(end) => end,
            httparse::Status::Partial => panic!("an incomplete head"),
        };
        assert_eq!(end, written.len(), "the blank line ends it");
        assert_eq!(parsed.code, Some(206));
        assert_eq!(parsed.reason, Some("Partial Content"));
        let value = |name: &str| {
            let found: Vec<&[u8]> = parsed
                .headers
                .iter()
                .filter(|h| h.name == name)
                .map(|h| h.value)
                .collect();
            assert_eq!(found.len(), 1, "{name} once");
            String::from_utf8(found[0].to_vec()).unwrap()
        };
        assert_eq!(value("Connection"), "keep-alive");
        assert_eq!(value("Content-Range"), "bytes 0-9/100");
        assert_eq!(value("ETag"), "\"1-64-2\"");
        assert_eq!(value("Accept-Ranges"), "bytes");
        assert_eq!(value("Retry-After"), "1");
        assert_eq!(value("Content-Length"), "10");
        assert_eq!(parsed.headers.len(), 10);

        // A 304 carries no length; a 405 says what is allowed.
        let mut not_modified = ResponseHead::new(304, false, "b");
        not_modified.content_length = None;
        let mut out = Vec::new();
        not_modified.write_to(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(!text.contains("Content-Length"));
        let mut refused = ResponseHead::new(405, true, "b");
        refused.allow = Some("GET, HEAD");
        let mut out = Vec::new();
        refused.write_to(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\r\nAllow: GET, HEAD\r\n"), "{text}");
        assert!(text.ends_with("Content-Length: 0\r\n\r\n"), "{text}");
    }
}
