//! The HTTP service: every decision about a request that does not depend on
//! the I/O backend.
//!
//! The engine parses a request head ([`crate::proto::http::request`]) and
//! hands it to [`HttpService::respond`], which returns a [`Response`]: the
//! head (with small bodies appended) and, for files, the byte ranges of the
//! mmapped file to send after it. The engine writes it and calls
//! [`HttpService::finished`] so that kernels and initrds become boot
//! events.
//!
//! Routes:
//! * `GET /boot.ipxe` — the chain script;
//! * `GET /boot/{mac}.ipxe` — that machine's script, from the router (any
//!   MAC spelling, URL-encoded or not); other names under `/boot/` are files;
//! * `GET /api/v1/events[?mac=…]`, `GET /api/v1/discovered` — read-only JSON,
//!   only when the control panel is off (with the panel on, the API lives
//!   on the panel's own listener, behind authentication, and never on the
//!   boot LAN);
//! * everything else — a file from the boot directory, with `Range`
//!   (single, multiple, suffix), `If-Range`, `ETag`/`Last-Modified` and
//!   conditional requests (304), under the same path-safety rules as TFTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::{Counter, Gauge, Labelled};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, trace, warn};

use crate::boot::events::{BootEvent, Phase};
use crate::boot::{chain_script, FileServed, Router};
use crate::cache::{CachedFile, FileCache, FileData};
use crate::proto::http::connection::{Connection, Piece};
use crate::proto::http::range::{self, BodyPlan, Multipart, Validators};
use crate::proto::http::request::{Method, Request};
use crate::proto::http::response::{content_type, not_modified, ResponseHead};
use crate::proto::path::{safe_relative_name, NameError};
use crate::proto::Mac;
use crate::server::paths::{resolve_served, ResolveError};

/// HTTP settings the service needs (the engine has its own timeouts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpServiceConfig {
    /// How scripts refer to this server (`http://host:port`); by default
    /// the request's `Host` header.
    pub public_url: Option<String>,
    /// Serve the read-only `/api/v1/` endpoints (only without the panel).
    pub serve_api: bool,
    /// Canonical paths under the root that are never served (the inventory
    /// file, the state directory, the database); see
    /// [`crate::server::paths::resolve_served`].
    pub private: Vec<std::path::PathBuf>,
    /// Loaders served from outside the root when it has none of that name.
    pub fallbacks: crate::server::paths::LoaderFallbacks,
    /// The port HTTPS listens on (`[http] tls_listen`): scripts asked for
    /// there name this server with `https://`.
    pub tls_port: Option<u16>,
}

/// What to send for one request.
pub struct Response {
    pub status: u16,
    /// Status line, headers and any small body.
    pub head: Vec<u8>,
    /// The file the segments are taken from.
    pub file: Option<Arc<FileData>>,
    /// What follows the head, in order.
    pub segments: Vec<Segment>,
    /// Whether the connection stays open afterwards.
    pub keep_alive: bool,
    /// The served file's path relative to the root, for boot events.
    pub served_path: Option<String>,
    /// `http`, or `https` for an answer on the TLS listener (boot events).
    pub transport: &'static str,
}

impl Response {
    /// Total bytes of the segments.
    pub fn body_len(&self) -> u64 {
        self.segments.iter().map(Segment::len).sum()
    }

    /// Begins writing this response on `connection` at `now`: file bodies
    /// by `sendfile` when `by_sendfile` (and the file is open), and the
    /// connection closed afterwards when the response says so or
    /// `close_after` (an answer to a bad request or a timeout).
    pub fn start_on(
        &self,
        connection: &mut Connection,
        by_sendfile: bool,
        close_after: bool,
        now: Instant,
    ) {
        let has_descriptor = self.file.as_ref().is_some_and(|f| f.raw_fd().is_some());
        let pieces = self.segments.iter().map(|segment| match segment {
            Segment::Bytes(bytes) => Piece::Bytes(bytes.len() as u64),
            Segment::File { len, .. } => Piece::File {
                len: *len,
                has_descriptor,
            },
        });
        connection.start_response(
            self.head.len(),
            pieces,
            by_sendfile,
            self.keep_alive && !close_after,
            now,
        );
    }

    /// The bytes of piece `piece` as [`Connection::poll_transmit`] numbers
    /// them: 0 is the head, `n` is segment `n - 1` (a file slice from the
    /// mapping).
    pub fn piece_bytes(&self, piece: usize) -> &[u8] {
        match piece {
            0 => &self.head,
            n => match &self.segments[n - 1] {
                Segment::Bytes(bytes) => bytes,
                Segment::File { offset, len } => {
                    let data = self
                        .file
                        .as_ref()
                        .expect("file segments come with their file");
                    &data[*offset as usize..(*offset + *len) as usize]
                }
            },
        }
    }

    /// The open file, offset and length of file piece `piece`, for
    /// `sendfile`; `None` for a piece that is not an open file's slice.
    pub fn file_piece(&self, piece: usize) -> Option<(std::os::fd::RawFd, u64, u64)> {
        match self.segments.get(piece.checked_sub(1)?)? {
            Segment::File { offset, len } => Some((self.file.as_ref()?.raw_fd()?, *offset, *len)),
            Segment::Bytes(_) => None,
        }
    }
}

/// A piece of a response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Bytes made for this response (multipart part headers).
    Bytes(Vec<u8>),
    /// A slice of the response's file.
    File { offset: u64, len: u64 },
}

impl Segment {
    pub fn len(&self) -> u64 {
        match self {
            Segment::Bytes(bytes) => bytes.len() as u64,
            Segment::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters shared by all connections (sharded per worker thread).
#[derive(Debug)]
pub struct HttpStats {
    pub requests: Counter,
    /// Body bytes sent, counted as the sockets take them.
    pub body_bytes: Counter,
    pub client_errors: Counter,
    /// Responses with a file body sent by `sendfile`, and copied from the
    /// mapping (see `http.body`).
    pub file_bodies_by_sendfile: Counter,
    pub file_bodies_copied: Counter,
    /// Responses by status ([`RESPONSE_STATUSES`]).
    pub by_status: Labelled,
    /// Connections open now (both engines keep it).
    pub open_connections: Gauge,
    /// Body bytes of every response begun ([`Self::response_started`]),
    /// and of those the bytes never sent (given up on, in
    /// [`HttpService::finished`]): with `body_bytes`, what
    /// [`Self::body_bytes_in_flight`] is made of. Sharded counters, not a
    /// gauge: `body_bytes` moves on every write, and a gauge there would
    /// be one atomic every worker writes to.
    body_bytes_promised: Counter,
    body_bytes_unsent: Counter,
    /// Per-MAC scripts rendered, by what was decided ([`SCRIPT_DECISIONS`]).
    pub scripts: Labelled,
}

/// What a per-MAC script can decide, as counted.
pub const SCRIPT_DECISIONS: &[&str] = &[
    "image",
    "menu-choice",
    "unknown",
    "local",
    "static",
    "image-not-here-yet",
];

fn decision_index(decision: &crate::boot::router::Decision) -> usize {
    use crate::boot::router::Decision;
    match decision {
        Decision::Assigned(_) => 0,
        Decision::MenuChoice(_) => 1,
        Decision::Unknown(_) => 2,
        Decision::Local(_) => 3,
        Decision::Static(_) => 4,
        Decision::NotHereYet(_) => 5,
    }
}

/// Statuses counted apart; the last is every other (kept in step with
/// `HttpStats::count_status`, which a test checks).
pub const RESPONSE_STATUSES: &[&str] = &[
    "200", "206", "304", "400", "403", "404", "405", "408", "413", "416", "431", "500", "503",
    "other",
];

impl Default for HttpStats {
    fn default() -> Self {
        Self {
            requests: Counter::default(),
            body_bytes: Counter::default(),
            client_errors: Counter::default(),
            file_bodies_by_sendfile: Counter::default(),
            file_bodies_copied: Counter::default(),
            by_status: Labelled::new("status", RESPONSE_STATUSES),
            open_connections: Gauge::default(),
            body_bytes_promised: Counter::default(),
            body_bytes_unsent: Counter::default(),
            scripts: Labelled::new("decision", SCRIPT_DECISIONS),
        }
    }
}

impl HttpStats {
    /// Counts a response by its status (an index into
    /// [`RESPONSE_STATUSES`], without formatting the number).
    fn count_status(&self, status: u16) {
        const COUNTED: [u16; 13] = [
            200, 206, 304, 400, 403, 404, 405, 408, 413, 416, 431, 500, 503,
        ];
        let index = COUNTED
            .iter()
            .position(|s| *s == status)
            .unwrap_or(COUNTED.len());
        self.by_status.inc(index);
    }

    /// `bytes` more body bytes went out (what `HttpConnection::sent`
    /// returns).
    pub fn body_written(&self, bytes: u64) {
        self.body_bytes.add(bytes);
    }

    /// Body bytes of responses under way that the sockets have not yet
    /// taken: what the HTTP data plane has promised and not delivered (a
    /// scrape; not for hot paths). Every byte sent or given up on was
    /// promised first, so reading those before the promises never comes
    /// out below zero.
    pub fn body_bytes_in_flight(&self) -> u64 {
        let delivered = self.body_bytes.get() + self.body_bytes_unsent.get();
        self.body_bytes_promised.get().saturating_sub(delivered)
    }

    /// Counts a response that begins, by how its file body (if any) goes:
    /// by `sendfile` if the engine chose it and the file has a descriptor
    /// (an empty file has none and is always copied), and adds its body to
    /// the bytes in flight. Every response an engine begins comes here,
    /// once, and ends in [`HttpService::finished`].
    pub fn response_started(&self, response: &Response, by_sendfile: bool) {
        self.body_bytes_promised.add(response.body_len());
        let Some(file) = &response.file else {
            return;
        };
        if !response.segments.is_empty() {
            let counter = if by_sendfile && file.raw_fd().is_some() {
                &self.file_bodies_by_sendfile
            } else {
                &self.file_bodies_copied
            };
            counter.inc();
        }
    }
}

/// The shared HTTP service.
pub struct HttpService {
    root: PathBuf,
    cache: FileCache,
    router: Arc<Router>,
    config: HttpServiceConfig,
    pub stats: HttpStats,
    boundary_counter: AtomicU64,
}

const SERVER: &str = concat!("bootfleet/", env!("CARGO_PKG_VERSION"));
const TEXT: &str = "text/plain; charset=utf-8";

impl HttpService {
    /// A service for the canonical boot `root`.
    pub fn new(
        root: &Path,
        cache: FileCache,
        router: Arc<Router>,
        config: HttpServiceConfig,
    ) -> Self {
        Self {
            root: root.to_path_buf(),
            cache,
            router,
            config,
            stats: HttpStats::default(),
            boundary_counter: AtomicU64::new(0),
        }
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Answers `request`, which arrived on `local` from `peer`; may touch
    /// the file system (resolve and open a file never served before, read
    /// an operator's per-MAC script).
    pub fn respond(&self, request: &Request, local: SocketAddr, peer: SocketAddr) -> Response {
        // With `may_block`, `answer` always answers.
        self.answer(request, local, peer, true)
            .unwrap_or_else(|| self.invalid(503, "cannot answer now, retry"))
    }

    /// [`Self::respond`] for a thread that must not block (an io_uring
    /// worker): `None` when the answer needs the file system, and then
    /// nothing was done or counted; the caller hands the request to a
    /// thread that may block, which calls [`Self::respond`]. A file served
    /// before, a script of an assigned machine, the chain script and every
    /// refusal are answered here.
    pub fn respond_without_blocking(
        &self,
        request: &Request,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Option<Response> {
        self.answer(request, local, peer, false)
    }

    /// The answer, or `None` (before anything is done or counted) when it
    /// needs the file system and `may_block` is false.
    fn answer(
        &self,
        request: &Request,
        local: SocketAddr,
        peer: SocketAddr,
        may_block: bool,
    ) -> Option<Response> {
        let mut response = self.answer_uncounted(request, local, peer, may_block)?;
        self.stats.requests.add(1);
        response.transport = self.transport(local);
        Some(response)
    }

    fn answer_uncounted(
        &self,
        request: &Request,
        local: SocketAddr,
        peer: SocketAddr,
        may_block: bool,
    ) -> Option<Response> {
        let head_only = request.method == Method::Head;
        trace!(%peer, method = ?request.method, path = %request.path, query = ?request.query, "HTTP request");
        if let Method::Other(method) = &request.method {
            debug!(%peer, %method, path = %request.path, "method not allowed");
            let mut head = self.head(405, request);
            head.allow = Some("GET, HEAD");
            return Some(self.text_with(head, "only GET and HEAD are served\n", false));
        }
        let path = request.path.as_str();

        if path == "/boot.ipxe" {
            let body = chain_script(&self.base_url(request, local));
            self.router.events.record(
                BootEvent::new(
                    self.router.machine_at(peer.ip()),
                    peer.ip(),
                    Phase::Chain,
                    self.transport(local),
                    "chain script".into(),
                )
                .bytes(body.len() as u64),
            );
            return Some(self.script(body.into_bytes(), request, head_only));
        }
        if let Some(mac) = path
            .strip_prefix("/boot/")
            .and_then(|rest| rest.strip_suffix(".ipxe"))
            .and_then(|name| Mac::parse(name).ok())
        {
            let (query, base_url) = (&request.query, self.base_url(request, local));
            let script = if may_block {
                self.router.machine_script(mac, query, &base_url, peer.ip())
            } else {
                self.router
                    .machine_script_without_blocking(mac, query, &base_url, peer.ip())?
            };
            self.stats.scripts.inc(decision_index(&script.decision));
            // A host this server leased an address to cannot write into
            // another machine's timeline by asking for its script.
            let speaks_for = self.router.may_speak_for(peer.ip(), mac);
            self.router.events.record(
                BootEvent::new(
                    speaks_for.then_some(mac),
                    peer.ip(),
                    Phase::Script,
                    self.transport(local),
                    script.decision.describe(),
                )
                .bytes(script.body.len() as u64),
            );
            return Some(self.script(script.body, request, head_only));
        }
        if let Some(api) = path.strip_prefix("/api/v1/") {
            if self.config.serve_api {
                return Some(self.api(api, request, head_only));
            }
            return Some(self.text(
                404,
                "the API is served on the control panel's listener (panel.listen), not on the boot LAN\n",
                request,
                head_only,
            ));
        }
        self.file(request, peer, head_only, may_block)
    }

    /// The response for a request head that could not be used.
    pub fn invalid(&self, status: u16, why: &str) -> Response {
        let mut head = ResponseHead::new(status, false, SERVER);
        head.content_type = Some(TEXT);
        self.stats.client_errors.add(1);
        self.whole(head, format!("{why}\n").as_bytes(), false)
    }

    /// Called by the engine when a response has been written (`sent` body
    /// bytes of `response.body_len()`), or given up on.
    pub fn finished(&self, response: &Response, peer: SocketAddr, sent: u64, elapsed: Duration) {
        // What was never sent is no longer in flight either.
        let unsent = response.body_len().saturating_sub(sent);
        if unsent > 0 {
            self.stats.body_bytes_unsent.add(unsent);
        }
        self.stats.count_status(response.status);
        if let Some(path) = &response.served_path {
            let complete = response.status == 200 && sent == response.body_len();
            let status = if sent == response.body_len() || response.status >= 400 {
                response.status
            } else {
                499
            };
            // A refusal's text is not the file.
            let sent = if response.status >= 400 { 0 } else { sent };
            self.router.file_served(&FileServed {
                path,
                client: peer.ip(),
                transport: response.transport,
                how: None,
                bytes: sent,
                duration: elapsed,
                status,
                complete,
            });
        }
    }

    /// `https` for a request that came to the TLS listener, else `http`.
    fn transport(&self, local: SocketAddr) -> &'static str {
        if self.config.tls_port == Some(local.port()) {
            "https"
        } else {
            "http"
        }
    }

    fn base_url(&self, request: &Request, local: SocketAddr) -> String {
        if let Some(url) = &self.config.public_url {
            return url.trim_end_matches('/').to_string();
        }
        let sane = |host: &str| {
            !host.is_empty()
                && host.len() <= 255
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        };
        let scheme = if self.transport(local) == "https" {
            "https://"
        } else {
            "http://"
        };
        match request.host.as_deref() {
            // Built by hand, not by `format!`: this runs for every script.
            Some(host) if sane(host) => [scheme, host].concat(),
            _ => format!("{scheme}{local}"),
        }
    }

    fn script(&self, body: Vec<u8>, request: &Request, head_only: bool) -> Response {
        let mut head = self.head(200, request);
        head.content_type = Some(TEXT);
        head.no_store = true;
        self.whole(head, &body, head_only)
    }

    fn text(&self, status: u16, body: &str, request: &Request, head_only: bool) -> Response {
        self.text_with(self.head(status, request), body, head_only)
    }

    /// A plain-text response with `head`'s status and headers.
    fn text_with(&self, mut head: ResponseHead<'_>, body: &str, head_only: bool) -> Response {
        if head.status >= 400 {
            self.stats.client_errors.add(1);
        }
        head.content_type = Some(TEXT);
        self.whole(head, body.as_bytes(), head_only)
    }

    fn json(&self, value: &impl serde::Serialize, request: &Request, head_only: bool) -> Response {
        let body = serde_json::to_vec_pretty(value)
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
        let mut head = self.head(200, request);
        head.content_type = Some("application/json");
        head.no_store = true;
        self.whole(head, &body, head_only)
    }

    /// The head every response to `request` starts from.
    fn head(&self, status: u16, request: &Request) -> ResponseHead<'static> {
        ResponseHead::new(status, request.keep_alive, SERVER)
    }

    /// A response made whole in memory: the body is written after the head
    /// (left out for HEAD), so it goes out in one piece.
    fn whole(&self, mut head: ResponseHead<'_>, body: &[u8], head_only: bool) -> Response {
        head.content_length = Some(body.len() as u64);
        self.in_memory(head, if head_only { &[] } else { body })
    }

    /// `head` as it is, then `body`.
    fn in_memory(&self, head: ResponseHead<'_>, body: &[u8]) -> Response {
        Response {
            status: head.status,
            head: encode(head, body),
            file: None,
            segments: Vec::new(),
            keep_alive: head.keep_alive,
            served_path: None,
            transport: "http",
        }
    }

    fn api(&self, api: &str, request: &Request, head_only: bool) -> Response {
        match api {
            "events" => {
                let mac = match request.query_value("mac").map(Mac::parse) {
                    None => None,
                    Some(Ok(mac)) => Some(mac),
                    Some(Err(e)) => return self.text(400, &format!("{e}\n"), request, head_only),
                };
                let limit = request
                    .query_value("limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(1000usize);
                self.json(&self.router.events.recent(mac, limit), request, head_only)
            }
            "discovered" => self.json(&self.router.seen_machines(true), request, head_only),
            "seen" => self.json(&self.router.seen_machines(false), request, head_only),
            _ => self.text(404, "no such API endpoint (this build serves /api/v1/events, /api/v1/discovered and /api/v1/seen)\n", request, head_only),
        }
    }

    /// A file from the boot directory. A refusal (404, 403, 416...) names
    /// the file it refused, so that [`Self::finished`] tells the router,
    /// which records it as a failed boot event when it is a loader, a
    /// kernel or an initrd.
    fn file(
        &self,
        request: &Request,
        peer: SocketAddr,
        head_only: bool,
        may_block: bool,
    ) -> Option<Response> {
        let mut response = self.file_or_refusal(request, peer, head_only, may_block)?;
        if response.status >= 400 && response.served_path.is_none() && !head_only {
            response.served_path = safe_relative_name(request.path.as_bytes()).ok();
        }
        Some(response)
    }

    fn file_or_refusal(
        &self,
        request: &Request,
        peer: SocketAddr,
        head_only: bool,
        may_block: bool,
    ) -> Option<Response> {
        let name = match safe_relative_name(request.path.as_bytes()) {
            Ok(name) => name,
            Err(NameError::Empty) => {
                return Some(self.text(404, "not found\n", request, head_only))
            }
            Err(why) => {
                warn!(%peer, path = %request.path.escape_debug(), %why, "refused request path");
                return Some(self.text(400, &format!("refused path: {why}\n"), request, head_only));
            }
        };
        // A name served before, unchanged since: no system call.
        if let Some(file) = self.cache.by_name(&name) {
            return Some(self.file_response(&name, file, request, head_only));
        }
        if !may_block {
            return None;
        }
        let ticket = self.cache.prepare_name(&name);
        let path = match resolve_served(&self.root, &self.config.private, &name)
            .or_else(|e| self.config.fallbacks.instead_of(e, &name))
        {
            Ok(path) => path,
            Err(ResolveError::NotFound) => {
                return Some(self.text(404, "not found\n", request, head_only))
            }
            Err(ResolveError::Private) => {
                tracing::info!(%peer, file = %name, "refused: the inventory, a dotfile, an upload in progress or server state is never served");
                return Some(self.text(404, "not found\n", request, head_only));
            }
            Err(ResolveError::PermissionDenied) | Err(ResolveError::Outside) => {
                return Some(self.text(403, "forbidden\n", request, head_only))
            }
        };
        let file = match self.cache.open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                return Some(self.text(404, "not found (not a regular file)\n", request, head_only))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Some(self.text(404, "not found\n", request, head_only))
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Some(self.text(403, "forbidden\n", request, head_only))
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot open file");
                let mut head = self.head(503, request);
                head.retry_after_seconds = Some(1);
                return Some(self.text_with(
                    head,
                    "cannot read file now, retry later\n",
                    head_only,
                ));
            }
        };
        self.cache.remember_name(ticket, &name, &path, &file);
        Some(self.file_response(&name, file, request, head_only))
    }

    fn file_response(
        &self,
        name: &str,
        file: CachedFile,
        request: &Request,
        head_only: bool,
    ) -> Response {
        let len = file.key.size;
        let etag = format!("\"{:x}-{:x}-{:x}\"", file.key.ino, len, file.key.mtime_ns);
        let mtime = UNIX_EPOCH + Duration::from_nanos(file.key.mtime_ns.max(0) as u64);
        let last_modified = httpdate::fmt_http_date(mtime);
        let validators = Validators {
            etag: &etag,
            last_modified: &last_modified,
        };
        let mut head = self.head(200, request);
        head.validators = Some(validators);

        if not_modified(request, &etag, mtime) {
            head.status = 304;
            head.content_length = None;
            return self.in_memory(head, &[]);
        }

        let plan = range::plan(
            request.range.as_deref(),
            request.if_range.as_deref(),
            len,
            validators,
        );
        let content_range;
        let multipart;
        head.content_type = Some(content_type(name));
        let segments = match plan {
            BodyPlan::Full => vec![Segment::File { offset: 0, len }],
            BodyPlan::Single(r) => {
                content_range = range::content_range(&r, len);
                head.status = 206;
                head.content_range = Some(&content_range);
                vec![Segment::File {
                    offset: *r.start(),
                    len: r.end() - r.start() + 1,
                }]
            }
            BodyPlan::Multiple(ranges) => {
                multipart = Multipart::new(&ranges, len, content_type(name), &self.boundary());
                let mut segments = Vec::with_capacity(multipart.parts.len() * 2 + 1);
                for (part_head, r) in &multipart.parts {
                    segments.push(Segment::Bytes(part_head.clone().into_bytes()));
                    segments.push(Segment::File {
                        offset: *r.start(),
                        len: r.end() - r.start() + 1,
                    });
                }
                segments.push(Segment::Bytes(multipart.closing.into_bytes()));
                head.status = 206;
                head.content_type = Some(&multipart.content_type);
                segments
            }
            BodyPlan::Unsatisfiable => {
                content_range = range::unsatisfied_range(len);
                head.status = 416;
                head.content_type = None;
                head.content_range = Some(&content_range);
                return self.in_memory(head, &[]);
            }
        };
        let segments: Vec<Segment> = segments.into_iter().filter(|s| !s.is_empty()).collect();
        head.content_length = Some(segments.iter().map(Segment::len).sum());
        Response {
            status: head.status,
            head: encode(head, &[]),
            file: Some(file.data),
            segments: if head_only { Vec::new() } else { segments },
            keep_alive: request.keep_alive,
            served_path: (!head_only).then(|| name.to_string()),
            transport: "http",
        }
    }

    /// A multipart boundary that differs per response.
    fn boundary(&self) -> String {
        let n = self.boundary_counter.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // splitmix64: spreads the bits so boundaries do not look alike.
        let mut z = nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        format!("bootfleet-{:016x}", z ^ (z >> 31))
    }
}

/// `head` with the `Date` header filled in, and `body` after it, in a
/// buffer of its own.
fn encode(head: ResponseHead<'_>, body: &[u8]) -> Vec<u8> {
    with_http_date_now(|date| {
        let mut out = Vec::with_capacity(320 + body.len());
        ResponseHead { date, ..head }.write_to(&mut out);
        out.extend_from_slice(body);
        out
    })
}

/// Calls `use_date` with the `Date` header's value, formatted once a second
/// per thread.
fn with_http_date_now<R>(use_date: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            *cached = (second, httpdate::fmt_http_date(now));
        }
        use_date(&cached.1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counted_status_lands_on_its_own_label() {
        let stats = HttpStats::default();
        for (index, label) in RESPONSE_STATUSES.iter().enumerate() {
            let status = label.parse().unwrap_or(299);
            stats.count_status(status);
            assert_eq!(stats.by_status.get(index), 1, "{label}");
        }
    }
}
