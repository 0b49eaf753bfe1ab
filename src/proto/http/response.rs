//! HTTP response framing and conditionals, sans-I/O: the status line's
//! reason phrase, the content type of a boot file, `Content-Length` and
//! header insertion on a head being written, and RFC 9110's conditional
//! requests (`If-None-Match`, `If-Modified-Since`). The service that builds
//! responses is [`crate::server::http`].

use std::time::{SystemTime, UNIX_EPOCH};

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

/// Ends a head with its `Content-Length` and the blank line.
pub fn finish_head(head: &mut Vec<u8>, content_length: u64) {
    // Written in place: this runs for every response.
    head.extend_from_slice(b"Content-Length: ");
    head.extend_from_slice(itoa::Buffer::new().format(content_length).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
}

/// Adds a header line to a head that already ends with its blank line.
pub fn insert_header(head: &mut Vec<u8>, line: &str) {
    if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
        head.splice(end + 2..end + 2, line.bytes());
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
    fn header_insertion_keeps_the_blank_line_last() {
        let mut head = b"HTTP/1.1 405 X\r\nA: b\r\n\r\nbody".to_vec();
        insert_header(&mut head, "Allow: GET\r\n");
        assert_eq!(head, b"HTTP/1.1 405 X\r\nA: b\r\nAllow: GET\r\n\r\nbody");
    }
}
