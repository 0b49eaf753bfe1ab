//! One HTTP/1.x request head, parsed by `httparse` and reduced to what a
//! file and script server needs.
//!
//! [`parse`] looks at the start of a connection's receive buffer and says
//! whether a whole head is there ([`Parsed::Complete`], with the bytes it
//! used so that pipelined requests follow), more bytes are needed
//! ([`Parsed::Partial`]), or the client sent something that gets an error
//! status and the connection closed ([`Parsed::Invalid`]).
//!
//! The target is split into a percent-decoded path and decoded query pairs
//! (iPXE escapes `${net0/mac}` as `52%3A54%3A00…` and its facts with
//! `:uristring`). Request bodies are not accepted: bootfleet's data plane
//! only serves GET and HEAD, so a request that announces a body is refused
//! rather than having its body mistaken for the next request.

use percent_encoding::percent_decode_str;

/// The request method, as far as the server cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// Anything else: answered with 405.
    Other(String),
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// Percent-decoded path, starting with `/`.
    pub path: String,
    /// Percent-decoded `name=value` pairs of the query string, in order.
    pub query: Vec<(String, String)>,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor_version: u8,
    pub host: Option<String>,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
    /// Whether the connection stays open after the response (HTTP/1.1
    /// unless `Connection: close`; HTTP/1.0 only with `keep-alive`).
    pub keep_alive: bool,
}

impl Request {
    /// The first query value named `name`.
    pub fn query_value(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// What the start of a receive buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole head of this many bytes.
    Complete(Box<Request>, usize),
    /// Not a whole head yet.
    Partial,
    /// Unusable: answer with this status and reason, then close.
    Invalid(u16, &'static str),
}

/// Most headers a request may carry (browsers send about 15).
const MAX_HEADERS: usize = 64;

/// Parses the head at the start of `buf`; heads longer than
/// `max_head_bytes` are refused with 431.
pub fn parse(buf: &[u8], max_head_bytes: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let used = match request.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) if buf.len() > max_head_bytes => {
            return Parsed::Invalid(431, "request head too large")
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Invalid(431, "too many request headers")
        }
        Err(httparse::Error::Version) => {
            return Parsed::Invalid(505, "only HTTP/1.0 and HTTP/1.1 are served")
        }
        Err(_) => return Parsed::Invalid(400, "malformed request head"),
    };
    if used > max_head_bytes {
        return Parsed::Invalid(431, "request head too large");
    }
    let (Some(method), Some(target), Some(minor_version)) =
        (request.method, request.path, request.version)
    else {
        return Parsed::Invalid(400, "malformed request line");
    };
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        other => Method::Other(other.to_string()),
    };

    let mut parsed = Request {
        method,
        path: String::new(),
        query: Vec::new(),
        minor_version,
        host: None,
        range: None,
        if_range: None,
        if_none_match: None,
        if_modified_since: None,
        keep_alive: minor_version >= 1,
    };
    for header in request.headers.iter() {
        let name = header.name;
        // Framing headers are never skipped, whatever their bytes (RFC 9112
        // §6.3): a request that announces a body in any spelling is refused
        // rather than having its body read as the next request.
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Invalid(411, "request bodies are not accepted");
        }
        let Ok(value) = std::str::from_utf8(header.value) else {
            if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("host") {
                return Parsed::Invalid(400, "a Content-Length or Host header is not text");
            }
            continue; // opaque bytes in a header we do not use
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("host") {
            // RFC 9112 §3.2: more than one Host is answered with 400.
            if parsed.host.is_some() {
                return Parsed::Invalid(400, "more than one Host header");
            }
            parsed.host = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("range") {
            parsed.range = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("if-range") {
            parsed.if_range = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("if-none-match") {
            parsed.if_none_match = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("if-modified-since") {
            parsed.if_modified_since = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    parsed.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") && minor_version == 0 {
                    parsed.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            // Content-Length = 1*DIGIT (RFC 9110 §8.6): no sign, no spaces
            // inside; Rust's parse would take "+0".
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Parsed::Invalid(400, "invalid Content-Length");
            }
            if value.bytes().any(|b| b != b'0') {
                return Parsed::Invalid(413, "request bodies are not accepted");
            }
        }
    }
    if minor_version >= 1 && parsed.host.is_none() {
        // RFC 9112 §3.2: a 1.1 request without Host is answered with 400.
        return Parsed::Invalid(400, "HTTP/1.1 request without Host header");
    }

    match split_target(target) {
        Ok((path, query)) => {
            parsed.path = path;
            parsed.query = query;
        }
        Err(why) => return Parsed::Invalid(400, why),
    }
    Parsed::Complete(Box::new(parsed), used)
}

/// A target's query, decoded, in order: `(name, value)`.
type QueryPairs = Vec<(String, String)>;

/// Splits an origin-form (or absolute-form) target into its decoded path
/// and query pairs.
fn split_target(target: &str) -> Result<(String, QueryPairs), &'static str> {
    let target = match target.find("://") {
        // absolute-form (RFC 9112 §3.2.2): keep only the path.
        Some(scheme_end) if !target.starts_with('/') => {
            let rest = &target[scheme_end + 3..];
            rest.find('/').map_or("/", |slash| &rest[slash..])
        }
        _ => target,
    };
    if !target.starts_with('/') {
        return Err("request target must be a path");
    }
    let target = target.split('#').next().unwrap_or(target);
    let (raw_path, raw_query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let path = percent_decode_str(raw_path)
        .decode_utf8()
        .map_err(|_| "path is not UTF-8 after decoding")?
        .into_owned();
    if path.bytes().any(|b| b == 0) {
        return Err("NUL byte in path");
    }
    let mut query = Vec::new();
    for pair in raw_query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        query.push((decode_query_part(name), decode_query_part(value)));
    }
    Ok((path, query))
}

fn decode_query_part(part: &str) -> String {
    let spaced = part.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(text: &str) -> (Request, usize) {
        match parse(text.as_bytes(), 8192) {
            Parsed::Complete(request, used) => (*request, used),
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn ipxe_request_with_escaped_mac_and_facts() {
        let text = "GET /boot/52%3A54%3A00%3A12%3A34%3A56.ipxe?uuid=1234-ab&manufacturer=QEMU%20Inc&product= HTTP/1.1\r\n\
                    Connection: keep-alive\r\nHost: 10.0.0.1\r\nUser-Agent: iPXE/1.21.1\r\n\r\n";
        let (request, used) = complete(text);
        assert_eq!(used, text.len());
        assert_eq!(request.method, Method::Get);
        assert_eq!(request.path, "/boot/52:54:00:12:34:56.ipxe");
        assert_eq!(request.query_value("uuid"), Some("1234-ab"));
        assert_eq!(request.query_value("manufacturer"), Some("QEMU Inc"));
        assert_eq!(request.query_value("product"), Some(""));
        assert_eq!(request.host.as_deref(), Some("10.0.0.1"));
        assert!(request.keep_alive);
    }

    #[test]
    fn pipelined_requests_are_taken_one_at_a_time() {
        let text = "HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /c";
        let (first, used) = complete(text);
        assert_eq!(first.method, Method::Head);
        let (second, used2) = complete(&text[used..]);
        assert_eq!(second.path, "/b");
        assert!(!second.keep_alive);
        assert_eq!(
            parse(&text.as_bytes()[used + used2..], 8192),
            Parsed::Partial
        );
    }

    #[test]
    fn keep_alive_rules_for_http_1_0() {
        assert!(!complete("GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            complete("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn conditional_and_range_headers_are_kept() {
        let (request, _) = complete(
            "GET /k HTTP/1.1\r\nhost: h\r\nrange: bytes=0-1\r\nIf-Range: \"e\"\r\n\
             If-None-Match: \"e\"\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n",
        );
        assert_eq!(request.range.as_deref(), Some("bytes=0-1"));
        assert_eq!(request.if_range.as_deref(), Some("\"e\""));
        assert_eq!(request.if_none_match.as_deref(), Some("\"e\""));
        assert!(request.if_modified_since.is_some());
    }

    #[test]
    fn absolute_form_targets_keep_only_the_path() {
        let (request, _) = complete("GET http://h:8080/x/y?z=1 HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(request.path, "/x/y");
        assert_eq!(request.query, vec![("z".into(), "1".into())]);
    }

    #[test]
    fn bad_requests_get_the_right_status() {
        let cases: &[(&str, u16)] = &[
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
            ("GET nopath HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            ("GET /%00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            ("GET /%ff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
                413,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                411,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",
                400,
            ),
            ("G\0T / HTTP/1.1\r\n\r\n", 400),
            // Security review finding 10: lenient framing (RFC 9112 §6.3).
            (
                "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +0\r\n\r\n",
                400,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -0\r\n\r\n",
                400,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0 0\r\n\r\n",
                400,
            ),
            ("GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        ];
        for (text, status) in cases {
            match parse(text.as_bytes(), 8192) {
                Parsed::Invalid(got, _) => assert_eq!(got, *status, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        // Framing headers with bytes that are not UTF-8 are not skipped.
        for head in [
            &b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\xff\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\xff\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\xff\r\n\r\n",
        ] {
            assert!(
                matches!(parse(head, 8192), Parsed::Invalid(400 | 411, _)),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
        assert!(matches!(
            parse(
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 00\r\n\r\n",
                8192
            ),
            Parsed::Complete(..)
        ));
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert!(matches!(
            parse(text.as_bytes(), 65536),
            Parsed::Invalid(431, _)
        ));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(9000));
        assert!(matches!(
            parse(long.as_bytes(), 8192),
            Parsed::Invalid(431, _)
        ));
    }

    #[test]
    fn other_methods_are_reported() {
        let (request, _) = complete("DELETE /x HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(request.method, Method::Other("DELETE".into()));
    }
}
