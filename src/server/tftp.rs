//! The TFTP service: everything about a request that does not depend on the
//! I/O backend.
//!
//! Both engines hand each datagram that arrives on the listening port to
//! [`TftpService::handle_request`], which parses it, resolves the file name
//! inside the boot root, applies the concurrency limits, looks the file up
//! in the generated-file seam and then the file cache, negotiates options
//! and returns either a ready [`Session`] transfer or an ERROR datagram to
//! send back. When a transfer ends the engine calls [`TftpService::finish`].
//!
//! Path safety: file names are relative to the boot root. A leading `/` is
//! taken as the root itself (as `in.tftpd --secure` does, because GRUB and
//! some firmware ask for `/grub/...`), so no name can name a file outside
//! it; `..` components, backslashes, NUL and control bytes, and symbolic
//! links whose target lies outside the root are refused with an access
//! violation and one log line.
//!
//! Write requests are refused with "access violation" unless the file's
//! directory is one of `tftp.upload_dirs` (or below one). An upload is
//! collected in memory up to `max_upload_mib`, written to a temporary file
//! in the same directory and renamed into place before the final ACK, so a
//! half-written upload is never visible and a full disk is reported to the
//! client as ERROR 3.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::boot::hooks::{FileGenerator, FinishedRead, TransferObserver};
use crate::cache::{CachedFile, FileCache, FileData};
use crate::config::TftpConfig;
use crate::proto::path::safe_relative_name;
use crate::proto::tftp::packet::{self, ErrorCode, Mode, Packet};
use crate::proto::tftp::{
    negotiate, netascii, CommitError, NegotiationLimits, Outcome, ReadTransfer, Transfer,
    TransferConfig, Transmit, WriteTransfer,
};
use crate::server::multicast::{Join, MulticastSessions};
use crate::server::paths::{resolve_served, LoaderFallbacks, ResolveError};

/// What to do with a datagram that arrived on the listening port.
pub enum Admission {
    /// Start this transfer on a new port.
    Start(Box<Session>),
    /// Send this ERROR datagram back to the sender from the listening port.
    Reply(Vec<u8>),
    /// Say nothing (e.g. an ERROR packet sent to the listening port).
    Ignore,
}

/// A request that needs the file system, handed back by
/// [`TftpService::handle_request_without_blocking`] with its place in the
/// limits held (so a retransmission of it meanwhile is known as a
/// duplicate), to be finished by [`TftpService::handle_blocking_request`].
pub struct BlockingRequest {
    datagram: Vec<u8>,
    peer: SocketAddr,
    slot: Option<LimitSlot>,
}

/// One running transfer, as every engine drives it (the epoll tasks, the
/// io_uring workers): the state machine, its bytes, and its slot in the
/// concurrency limits (released when this is dropped). The contract is
/// quinn's: feed it datagrams ([`Session::handle_datagram`]) and
/// timeouts ([`Session::handle_timeout`]), send what
/// [`Session::poll_transmit`] gives (DATA blocks from
/// [`Session::block`]), wake it at [`Session::poll_timeout`], and hand it
/// to [`TftpService::finish`] once [`Session::is_over`]. The policy the
/// engines used to call themselves (a file changed under a read ends it;
/// a finished upload is stored before its last ACK; the client's first
/// sign of life is noted) lives in these methods, so an engine moves
/// bytes and nothing else.
pub struct Session {
    transfer: Transfer,
    /// The file being read (empty for uploads).
    data: Arc<FileData>,
    /// Where an upload is stored.
    upload_path: Option<PathBuf>,
    pub name: String,
    pub peer: SocketAddr,
    pub started_at: Instant,
    slot: LimitSlot,
}

impl Session {
    /// A newer request from the same client port replaced this transfer:
    /// the engine ends it without sending anything more.
    pub fn superseded(&self) -> bool {
        self.slot.flags.superseded.load(Ordering::Relaxed)
    }

    /// The transfer has an outcome, or was superseded: nothing more to do
    /// but send a final ERROR that [`Session::poll_transmit`] gave.
    pub fn is_over(&self) -> bool {
        self.transfer.outcome().is_some() || self.superseded()
    }

    /// The state machine (for what the engines size their buffers by).
    pub fn transfer(&self) -> &Transfer {
        &self.transfer
    }

    /// DATA block `index`'s payload.
    pub fn block(&self, index: u64) -> &[u8] {
        &self.data[self.transfer.block_range(index)]
    }

    /// The next thing to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transfer.poll_transmit()
    }

    /// Ends a read whose file was rewritten in place since it started (its
    /// client retries and gets the new file whole): an atomic load (the
    /// cache's checker thread does the file status calls). Run once per
    /// datagram or timeout, before the windows they release are polled.
    fn end_if_file_changed(&mut self) {
        if let Transfer::Read(read) = &mut self.transfer {
            if read.outcome().is_none() && self.data.changed() {
                info!(peer = %self.peer, file = %self.name, "file changed on disk during the transfer; ending it");
                read.abort("file changed on disk during the transfer; retry");
            }
        }
    }

    /// When [`Session::handle_timeout`] is due, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.transfer.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.transfer.handle_timeout(now);
        self.end_if_file_changed();
    }

    /// A datagram from the client's port. Notes the client's first sign of
    /// life (see [`Session::superseded`]) and stores a finished upload,
    /// letting it send its final ACK (or ERROR 3 on a full disk); costs two
    /// loads otherwise.
    pub fn handle_datagram(&mut self, datagram: &[u8], now: Instant) {
        self.transfer.handle_datagram(datagram, now);
        let flags = &self.slot.flags;
        if !flags.progressed.load(Ordering::Relaxed) && self.transfer.progressed() {
            flags.progressed.store(true, Ordering::Release);
        }
        self.store_finished_upload(now);
        self.end_if_file_changed();
    }

    fn store_finished_upload(&mut self, now: Instant) {
        let Transfer::Write(write) = &mut self.transfer else {
            return;
        };
        let Some(bytes): Option<Vec<u8>> = write.take_upload() else {
            return;
        };
        let Some(path) = &self.upload_path else {
            return;
        };
        let result = store_atomically(path, &bytes);
        match &result {
            Ok(()) => {
                info!(peer = %self.peer, file = %self.name, bytes = bytes.len(), "upload stored")
            }
            Err(e) => {
                warn!(peer = %self.peer, file = %self.name, error = %e, "cannot store upload")
            }
        }
        write.commit(
            result.map_err(|e| match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => CommitError::DiskFull,
                _ if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    CommitError::AccessViolation
                }
                Some(libc::EROFS) => CommitError::AccessViolation,
                _ => CommitError::Other,
            }),
            now,
        );
    }
}

/// Counters shared by all workers (sharded per worker thread).
#[derive(Debug, Default)]
pub struct TftpStats {
    pub started: crate::metrics::Counter,
    pub completed: crate::metrics::Counter,
    pub failed: crate::metrics::Counter,
    pub refused: crate::metrics::Counter,
    pub bytes_completed: crate::metrics::Counter,
    pub retransmitted_blocks: crate::metrics::Counter,
}

/// A point-in-time copy of [`TftpStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TftpStatsSnapshot {
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    pub refused: u64,
    pub bytes_completed: u64,
    pub retransmitted_blocks: u64,
    pub active: usize,
}

/// The shared TFTP service; one per server, used by every worker.
pub struct TftpService {
    root: PathBuf,
    /// Canonical paths under the root that are never served (see
    /// [`crate::server::paths::resolve_served`]).
    private: Vec<PathBuf>,
    fallbacks: LoaderFallbacks,
    cache: FileCache,
    generators: Vec<Arc<dyn FileGenerator>>,
    observers: Vec<Arc<dyn TransferObserver>>,
    negotiation: NegotiationLimits,
    transfer: TransferConfig,
    limits: Arc<Limits>,
    stats: TftpStats,
    /// Canonical upload directories (empty: uploads refused).
    upload_dirs: Vec<PathBuf>,
    max_upload_bytes: u64,
    /// RFC 2090 sessions, when multicast is configured.
    multicast: Option<Arc<dyn MulticastSessions>>,
}

/// Largest block size granted to uploads: DATA must fit the engines'
/// 2 KiB receive buffers.
pub const MAX_UPLOAD_BLKSIZE: u16 = 1468;

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it
/// over `path`: readers see the old file or the whole new one, never a part.
fn store_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("upload");
    let tmp = path.with_file_name(format!(
        ".{name}.upload-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = std::fs::File::create_new(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        crate::durable::sync_parent_dir(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl TftpService {
    /// A service for `root` (which must exist) with the given settings.
    pub fn new(root: &Path, config: &TftpConfig, cache: FileCache) -> std::io::Result<Self> {
        let root = root.canonicalize().map_err(|e| {
            std::io::Error::new(e.kind(), format!("boot directory {}: {e}", root.display()))
        })?;
        let mut upload_dirs = Vec::new();
        for dir in &config.upload_dirs {
            let canonical = root.join(dir).canonicalize().map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "upload directory {} (tftp.upload_dirs): {e}",
                        root.join(dir).display()
                    ),
                )
            })?;
            if !canonical.starts_with(&root) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "upload directory {} lies outside the boot directory",
                        canonical.display()
                    ),
                ));
            }
            upload_dirs.push(canonical);
        }
        Ok(Self {
            root,
            private: Vec::new(),
            fallbacks: LoaderFallbacks::default(),
            cache,
            generators: Vec::new(),
            observers: Vec::new(),
            negotiation: NegotiationLimits {
                max_blksize: config.max_blksize,
                max_windowsize: config.max_windowsize,
            },
            transfer: TransferConfig {
                initial_timeout: config.timeout,
                max_timeout: config.max_timeout,
                max_retries: config.max_retries,
            },
            limits: Arc::new(Limits {
                max_total: config.max_transfers,
                max_per_client: config.max_transfers_per_client,
                active: AtomicUsize::new(0),
                clients: Mutex::new(ActiveClients::default()),
            }),
            stats: TftpStats::default(),
            upload_dirs,
            max_upload_bytes: config.max_upload_bytes,
            multicast: None,
        })
    }

    /// Never serves anything at or under these canonical paths (the
    /// inventory file, the state directory, the database).
    pub fn set_private_paths(&mut self, private: Vec<PathBuf>) {
        self.private = private;
    }

    /// Loaders served from outside the root when it has none of that name.
    pub fn set_loader_fallbacks(&mut self, fallbacks: LoaderFallbacks) {
        self.fallbacks = fallbacks;
    }

    /// Serves read requests that ask for `multicast` through `hub`.
    pub fn set_multicast(&mut self, hub: Arc<dyn MulticastSessions>) {
        self.multicast = Some(hub);
    }

    /// Adds a generator; generators are asked in the order they were added.
    pub fn add_generator(&mut self, generator: Arc<dyn FileGenerator>) {
        self.generators.push(generator);
    }

    /// Adds an observer of finished read transfers.
    pub fn add_observer(&mut self, observer: Arc<dyn TransferObserver>) {
        self.observers.push(observer);
    }

    /// The canonical boot root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Largest block size this service grants (sizes engine buffers).
    pub fn max_blksize(&self) -> u16 {
        self.negotiation.max_blksize
    }

    pub fn stats(&self) -> TftpStatsSnapshot {
        let s = &self.stats;
        TftpStatsSnapshot {
            started: s.started.get(),
            completed: s.completed.get(),
            failed: s.failed.get(),
            refused: s.refused.get(),
            bytes_completed: s.bytes_completed.get(),
            retransmitted_blocks: s.retransmitted_blocks.get(),
            active: self.limits.active.load(Ordering::Relaxed),
        }
    }

    /// Decides what to do with a datagram that arrived on the listening
    /// port; may touch the file system (resolve and open a file never
    /// served before, create an upload).
    pub fn handle_request(&self, datagram: &[u8], peer: SocketAddr, now: Instant) -> Admission {
        // With `may_block`, `admit` always decides.
        self.admit(datagram, peer, now, None, true)
            .unwrap_or(Admission::Ignore)
    }

    /// [`Self::handle_request`] for a thread that must not block (an
    /// io_uring worker): a request that needs the file system comes back,
    /// with its place in the limits held, to be finished by
    /// [`Self::handle_blocking_request`] on a thread that may block. A
    /// file served before, a refusal and an ERROR are decided here.
    pub fn handle_request_without_blocking(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        now: Instant,
    ) -> Result<Admission, BlockingRequest> {
        self.admit(datagram, peer, now, None, false)
            .map_err(|slot| BlockingRequest {
                datagram: datagram.to_vec(),
                peer,
                slot,
            })
    }

    /// Finishes a request [`Self::handle_request_without_blocking`]
    /// handed back.
    pub fn handle_blocking_request(&self, request: BlockingRequest, now: Instant) -> Admission {
        let BlockingRequest {
            datagram,
            peer,
            slot,
        } = request;
        self.admit(&datagram, peer, now, slot, true)
            .unwrap_or(Admission::Ignore)
    }

    /// The admission of `datagram` from `peer`, holding `held` (a place in
    /// the limits taken before) if any. Without `may_block`, a request
    /// that needs the file system is not decided: `Err` hands back the
    /// place it took.
    fn admit(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        now: Instant,
        held: Option<LimitSlot>,
        may_block: bool,
    ) -> Result<Admission, Option<LimitSlot>> {
        let request = match Packet::parse(datagram) {
            Ok(Packet::Rrq(request)) => request,
            Ok(Packet::Wrq(_)) if !may_block && !self.upload_dirs.is_empty() => return Err(None),
            Ok(Packet::Wrq(request)) => return Ok(self.handle_write(&request, peer, now)),
            // Never answer an ERROR: two servers could bounce errors forever.
            Ok(Packet::Error { .. }) => return Ok(Admission::Ignore),
            Ok(other) => {
                debug!(%peer, packet = %other, "packet for an unknown transfer on the listening port");
                return Ok(self.refuse(ErrorCode::UnknownTransferId, "unknown transfer ID"));
            }
            Err(error) => {
                info!(%peer, %error, "malformed TFTP request");
                return Ok(self.refuse(
                    ErrorCode::IllegalOperation,
                    &format!("malformed request: {error}"),
                ));
            }
        };
        self.admit_read(&request, peer, now, held, may_block)
    }

    /// [`Self::admit`] for a read request.
    fn admit_read(
        &self,
        request: &crate::proto::tftp::Request<'_>,
        peer: SocketAddr,
        now: Instant,
        held: Option<LimitSlot>,
        may_block: bool,
    ) -> Result<Admission, Option<LimitSlot>> {
        let name = match safe_relative_name(request.filename) {
            Ok(name) => name,
            Err(why) => {
                warn!(%peer, file = %String::from_utf8_lossy(request.filename).escape_debug(), %why, "refused file name");
                return Ok(self.refuse(ErrorCode::AccessViolation, &why.to_string()));
            }
        };

        let slot = match held {
            Some(slot) => slot,
            None => match self.take_slot(peer, &name) {
                Ok(slot) => slot,
                Err(admission) => return Ok(admission),
            },
        };
        // A name served before, unchanged since: no system call.
        let cached = self.cache.by_name(&name);
        if !may_block && (cached.is_none() || self.generators.iter().any(|g| g.may_block(&name))) {
            return Err(Some(slot));
        }

        let data = match self.lookup(&name, peer, cached) {
            Ok(data) => data,
            Err((code, why)) => {
                info!(%peer, file = %name, why, "refused read request");
                self.tell_refused(&name, peer, refusal_status(code));
                return Ok(self.refuse(code, why));
            }
        };
        // A netascii read converts block by block as its windows go out
        // (never the whole file here, on the receive path); its converted
        // length is unknown until the end, so it acknowledges no tsize.
        let netascii = request.mode == Mode::Netascii;
        let negotiated = if netascii {
            let options: Vec<(&str, &str)> = request
                .options
                .iter()
                .copied()
                .filter(|(name, _)| !name.eq_ignore_ascii_case("tsize"))
                .collect();
            negotiate(&options, data.len() as u64, self.negotiation)
        } else {
            negotiate(&request.options, data.len() as u64, self.negotiation)
        };
        if let (Some(hub), Mode::Octet, Some(_)) =
            (&self.multicast, request.mode, request.option("multicast"))
        {
            let join = Join {
                name: name.clone(),
                data: Arc::clone(&data),
                peer,
                blksize: negotiated.blksize,
                windowsize: negotiated.windowsize,
                options: negotiated.oack.clone(),
            };
            // The session answers from its own port; with no group free,
            // the request is served by unicast below.
            if hub.join(join).is_ok() {
                return Ok(Admission::Ignore);
            }
        }
        let transfer = Transfer::Read(if netascii {
            let source: netascii::Source = Arc::clone(&data) as netascii::Source;
            ReadTransfer::new_netascii(&negotiated, source, self.transfer, now)
        } else {
            ReadTransfer::new(&negotiated, data.len() as u64, self.transfer, now)
        });
        self.stats.started.add(1);
        debug!(
            %peer, file = %name, size = data.len(), blksize = negotiated.blksize,
            windowsize = negotiated.windowsize, "transfer started"
        );
        Ok(Admission::Start(Box::new(Session {
            transfer,
            data,
            upload_path: None,
            name,
            peer,
            started_at: now,
            slot,
        })))
    }

    /// Admits an upload into one of the upload directories.
    fn handle_write(
        &self,
        request: &crate::proto::tftp::Request<'_>,
        peer: SocketAddr,
        now: Instant,
    ) -> Admission {
        let raw = String::from_utf8_lossy(request.filename);
        if self.upload_dirs.is_empty() {
            info!(%peer, file = %raw, "refused write request: uploads are disabled");
            return self.refuse(
                ErrorCode::AccessViolation,
                "uploads are disabled on this server",
            );
        }
        let name = match safe_relative_name(request.filename) {
            Ok(name) => name,
            Err(why) => {
                warn!(%peer, file = %raw.escape_debug(), %why, "refused upload file name");
                return self.refuse(ErrorCode::AccessViolation, &why.to_string());
            }
        };
        let relative = Path::new(&name);
        let (Some(parent), Some(file_name)) = (relative.parent(), relative.file_name()) else {
            return self.refuse(ErrorCode::AccessViolation, "invalid file name");
        };
        let Ok(dir) = self.root.join(parent).canonicalize() else {
            info!(%peer, file = %name, "refused upload: directory does not exist");
            return self.refuse(
                ErrorCode::AccessViolation,
                "upload directory does not exist",
            );
        };
        if !self
            .upload_dirs
            .iter()
            .any(|allowed| dir.starts_with(allowed))
        {
            info!(%peer, file = %name, "refused upload outside the upload directories");
            return self.refuse(
                ErrorCode::AccessViolation,
                "uploads are not allowed in this directory",
            );
        }
        let path = dir.join(file_name);
        if path.is_dir() {
            return self.refuse(ErrorCode::AccessViolation, "a directory has that name");
        }
        // windowsize is not offered for uploads; tsize announces the size.
        let options: Vec<(&str, &str)> = request
            .options
            .iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case("windowsize"))
            .copied()
            .collect();
        let announced = request
            .option("tsize")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if announced > self.max_upload_bytes {
            info!(%peer, file = %name, announced, "refused upload: larger than max_upload_mib");
            return self.refuse(
                ErrorCode::DiskFull,
                "upload larger than this server accepts",
            );
        }
        let slot = match self.take_slot(peer, &name) {
            Ok(slot) => slot,
            Err(admission) => return admission,
        };
        let limits = NegotiationLimits {
            // Upload DATA must fit the engines' receive buffers.
            max_blksize: self.negotiation.max_blksize.min(MAX_UPLOAD_BLKSIZE),
            max_windowsize: 1,
        };
        let negotiated = negotiate(&options, announced, limits);
        let transfer = Transfer::Write(WriteTransfer::new(
            &negotiated,
            self.max_upload_bytes,
            self.transfer,
            now,
        ));
        self.stats.started.add(1);
        debug!(%peer, file = %name, "upload started");
        Admission::Start(Box::new(Session {
            transfer,
            data: Arc::new(FileData::Owned(Vec::new())),
            upload_path: Some(path),
            name,
            peer,
            started_at: now,
            slot,
        }))
    }

    /// The engine could not open a port for an admitted transfer (e.g. out of
    /// file descriptors during a power-on storm). Returns the ERROR to send
    /// from the listening port, so the client retries instead of waiting in
    /// silence; the transfer counts as refused.
    pub fn transfer_port_failed(&self, started: Session, error: &std::io::Error) -> Vec<u8> {
        warn!(peer = %started.peer, file = %started.name, %error, "cannot open a transfer port; told the client to retry");
        self.stats.started.sub(1);
        drop(started);
        self.error_reply(
            ErrorCode::NotDefined,
            "server busy: no transfer port available, retry later",
        )
    }

    /// Records how a transfer ended. Its limit slot is released when the
    /// engine drops the [`Session`], once the kernel holds none of its buffers.
    pub fn finish(&self, started: &Session, now: Instant) {
        started.slot.release();
        let elapsed = now.saturating_duration_since(started.started_at);
        let retransmitted = started.transfer.retransmitted_blocks();
        let size_query = matches!(
            started.transfer.outcome(),
            Some(Outcome::OptionsDeclined { .. })
        );
        let superseded = started.transfer.outcome().is_none() && started.superseded();
        if let (Transfer::Read(read), false, false) = (&started.transfer, size_query, superseded) {
            let complete = matches!(started.transfer.outcome(), Some(Outcome::Complete));
            let finished = FinishedRead {
                name: &started.name,
                peer: started.peer,
                bytes: if complete {
                    started.data.len() as u64
                } else {
                    0
                },
                elapsed,
                complete,
                status: outcome_status(started.transfer.outcome()),
                blksize: read.blksize(),
                windowsize: read.windowsize(),
                multicast: None,
            };
            for observer in &self.observers {
                observer.read_finished(&finished);
            }
        }
        self.stats.retransmitted_blocks.add(retransmitted);
        match started.transfer.outcome() {
            Some(Outcome::Complete) => {
                self.stats.completed.add(1);
                let bytes = match &started.transfer {
                    Transfer::Read(_) => started.data.len() as u64,
                    Transfer::Write(write) => write.received(),
                };
                self.stats.bytes_completed.add(bytes);
                debug!(peer = %started.peer, file = %started.name, bytes = started.data.len(),
                    ms = elapsed.as_millis() as u64, retransmitted, "transfer complete");
            }
            Some(Outcome::OptionsDeclined { code }) => {
                debug!(peer = %started.peer, file = %started.name, code,
                    "client declined the options (a size query); its download follows");
            }
            None if started.superseded() => {
                debug!(peer = %started.peer, file = %started.name,
                    "transfer replaced by a newer request from the same client port");
            }
            outcome => {
                self.stats.failed.add(1);
                let outcome = outcome.map_or_else(|| "abandoned".to_string(), |o| format!("{o:?}"));
                info!(peer = %started.peer, file = %started.name, %outcome,
                    ms = elapsed.as_millis() as u64, "transfer failed");
            }
        }
    }

    /// Tells the observers that a read of `name` was refused with `status`
    /// (a missing kernel becomes a failed boot event).
    fn tell_refused(&self, name: &str, peer: SocketAddr, status: u16) {
        let refused = FinishedRead {
            name,
            peer,
            bytes: 0,
            elapsed: Duration::ZERO,
            complete: false,
            status,
            blksize: 0,
            windowsize: 0,
            multicast: None,
        };
        for observer in &self.observers {
            observer.read_finished(&refused);
        }
    }

    /// A transfer's place in the limits, or what to answer instead.
    fn take_slot(&self, peer: SocketAddr, name: &str) -> Result<LimitSlot, Admission> {
        match self.limits.acquire(peer) {
            Ok(slot) => Ok(slot),
            Err(LimitRefusal::Duplicate) => {
                // The client retransmitted its request because our first
                // packet was lost or slow. Its transfer is already running
                // and will retransmit that packet; a second transfer to the
                // same port would only make the client reject one of them.
                debug!(%peer, file = %name, "duplicate request for a running transfer ignored");
                Err(Admission::Ignore)
            }
            Err(LimitRefusal::Full(why)) => {
                info!(%peer, file = %name, why, "refused: transfer limit reached");
                self.tell_refused(name, peer, 503);
                Err(self.refuse(ErrorCode::NotDefined, why))
            }
        }
    }

    fn refuse(&self, code: ErrorCode, message: &str) -> Admission {
        Admission::Reply(self.error_reply(code, message))
    }

    /// An ERROR datagram for a request this server turns down (counted).
    fn error_reply(&self, code: ErrorCode, message: &str) -> Vec<u8> {
        self.stats.refused.add(1);
        let mut reply = Vec::with_capacity(message.len() + 5);
        packet::encode_error(code, message, &mut reply);
        reply
    }

    /// The bytes of `name`: generated, or `cached` (the version served
    /// before, looked up by the caller), or resolved and opened now.
    fn lookup(
        &self,
        name: &str,
        peer: SocketAddr,
        cached: Option<CachedFile>,
    ) -> Result<Arc<FileData>, (ErrorCode, &'static str)> {
        for generator in &self.generators {
            if let Some(bytes) = generator.generate(name, peer) {
                return Ok(Arc::new(FileData::Owned(bytes)));
            }
        }
        if let Some(file) = cached {
            return Ok(file.data);
        }
        let ticket = self.cache.prepare_name(name);
        let path = self.resolve_on_disk(name)?;
        match self.cache.open(&path) {
            Ok(file) => {
                self.cache.remember_name(ticket, name, &path, &file);
                Ok(file.data)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err((ErrorCode::FileNotFound, "file not found"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                Err((ErrorCode::AccessViolation, "permission denied"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                Err((ErrorCode::FileNotFound, "not a regular file"))
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                warn!(file = %path.display(), error = %e, "out of file descriptors; raise LimitNOFILE");
                Err((
                    ErrorCode::NotDefined,
                    "server busy: out of file descriptors, retry later",
                ))
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot open file");
                Err((ErrorCode::NotDefined, "cannot read file"))
            }
        }
    }

    /// The file's canonical path, which must lie inside the root.
    fn resolve_on_disk(&self, name: &str) -> Result<PathBuf, (ErrorCode, &'static str)> {
        resolve_served(&self.root, &self.private, name)
            .or_else(|e| self.fallbacks.instead_of(e, name))
            .map_err(|e| match e {
            ResolveError::NotFound => (ErrorCode::FileNotFound, "file not found"),
            ResolveError::Private => {
                info!(file = %name, "refused: the inventory, a dotfile, an upload in progress or server state is never served");
                (ErrorCode::FileNotFound, "file not found")
            }
            ResolveError::PermissionDenied => (ErrorCode::AccessViolation, "permission denied"),
            ResolveError::Outside => (
                ErrorCode::AccessViolation,
                "path leads outside the boot directory",
            ),
        })
    }
}

/// The HTTP status a refused read is recorded with.
fn refusal_status(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::FileNotFound => 404,
        ErrorCode::AccessViolation => 403,
        _ => 503,
    }
}

/// The HTTP status a finished read is recorded with (see
/// [`crate::boot::events::failure_cause`]).
fn outcome_status(outcome: Option<&Outcome>) -> u16 {
    match outcome {
        Some(Outcome::Complete) | Some(Outcome::OptionsDeclined { .. }) => 200,
        Some(Outcome::ClientError { .. }) | None => 499,
        Some(Outcome::TimedOut) => 408,
        Some(Outcome::ProtocolViolation(_)) => 400,
        Some(Outcome::Aborted(_)) => 500,
    }
}

/// Concurrency limits, global and per client address, and the set of
/// client ports with a running transfer (to recognise repeated requests).
struct Limits {
    max_total: usize,
    max_per_client: usize,
    active: AtomicUsize,
    clients: Mutex<ActiveClients>,
}

#[derive(Default)]
struct ActiveClients {
    per_ip: HashMap<IpAddr, usize>,
    /// Client ports whose transfer has not ended yet, with the id of that
    /// transfer's slot and its flags. Released as soon as the transfer ends
    /// (not when the engine frees its memory), because clients reuse ports
    /// at once.
    ports: HashMap<SocketAddr, (u64, Arc<TransferFlags>)>,
    next_id: u64,
}

enum LimitRefusal {
    /// This client port already has a running transfer.
    Duplicate,
    Full(&'static str),
}

impl Limits {
    fn acquire(self: &Arc<Self>, peer: SocketAddr) -> Result<LimitSlot, LimitRefusal> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, running)) = clients.ports.get(&peer) {
            if !running.progressed.load(Ordering::Acquire) {
                // The client has not heard from that transfer yet: this is
                // its request again (our first packet was lost or is late),
                // and the running transfer will retransmit.
                return Err(LimitRefusal::Duplicate);
            }
            // The client acknowledged that transfer and now asks again from
            // the same port: it has moved on (finished, with the final ACK
            // still on its way, or gave up). The old transfer goes silent.
            running.superseded.store(true, Ordering::Release);
            clients.ports.remove(&peer);
        }
        if self.active.load(Ordering::Relaxed) >= self.max_total {
            return Err(LimitRefusal::Full(
                "server busy: too many transfers, retry later",
            ));
        }
        let count = clients.per_ip.entry(peer.ip()).or_insert(0);
        if *count >= self.max_per_client {
            return Err(LimitRefusal::Full(
                "too many transfers from this client, retry later",
            ));
        }
        *count += 1;
        clients.next_id += 1;
        let id = clients.next_id;
        let flags = Arc::new(TransferFlags::default());
        clients.ports.insert(peer, (id, Arc::clone(&flags)));
        self.active.fetch_add(1, Ordering::Relaxed);
        Ok(LimitSlot {
            limits: Arc::clone(self),
            peer,
            id,
            flags,
            released: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Forgets that `peer`'s port has a running transfer, if the entry is
    /// still the one of slot `id`.
    fn release_port(clients: &mut ActiveClients, peer: SocketAddr, id: u64) {
        if clients
            .ports
            .get(&peer)
            .is_some_and(|(entry, _)| *entry == id)
        {
            clients.ports.remove(&peer);
        }
    }
}

/// One transfer's place in the limits: released when the transfer ends
/// ([`TftpService::finish`]), or at the latest when it is dropped.
struct LimitSlot {
    limits: Arc<Limits>,
    peer: SocketAddr,
    id: u64,
    flags: Arc<TransferFlags>,
    released: std::sync::atomic::AtomicBool,
}

/// What the admission side must know about a running transfer.
#[derive(Default)]
struct TransferFlags {
    /// The client acknowledged or sent something (set by
    /// [`Session::handle_datagram`]).
    progressed: AtomicBool,
    /// A newer request from the same client port replaced this transfer.
    superseded: AtomicBool,
}

impl LimitSlot {
    /// Gives the place back, once: the transfer no longer counts against the
    /// limits, and a new request from the same port is a new transfer.
    fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut clients = self
            .limits
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Limits::release_port(&mut clients, self.peer, self.id);
        if let Some(count) = clients.per_ip.get_mut(&self.peer.ip()) {
            *count -= 1;
            if *count == 0 {
                clients.per_ip.remove(&self.peer.ip());
            }
        }
        self.limits.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for LimitSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// How long an engine may sleep with nothing due, so that it notices shutdown.
pub const IDLE_POLL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    fn service(dir: &Path, max_per_client: usize) -> TftpService {
        let mut config = crate::config::Config::default().tftp;
        config.max_transfers_per_client = max_per_client;
        TftpService::new(dir, &config, FileCache::new(1 << 20)).unwrap()
    }

    fn rrq(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        packet::encode_rrq(name, Mode::Octet, &[], &mut out);
        out
    }

    fn error_code(admission: &Admission) -> Option<u16> {
        match admission {
            Admission::Reply(bytes) => match Packet::parse(bytes) {
                Ok(Packet::Error { code, .. }) => Some(code),
                _ => None,
            },
            _ => None,
        }
    }

    #[test]
    fn names_are_kept_inside_the_root() {
        assert_eq!(safe_relative_name(b"pxelinux.0").unwrap(), "pxelinux.0");
        assert_eq!(
            safe_relative_name(b"/grub//x86_64-efi/./a.mod").unwrap(),
            "grub/x86_64-efi/a.mod"
        );
        for hostile in [
            &b"../etc/passwd"[..],
            b"a/../../b",
            b"..",
            b"a\\..\\b",
            b"a\x01b",
            b"\xff\xfe",
            b"/",
            b"./.",
        ] {
            assert!(safe_relative_name(hostile).is_err(), "{hostile:?}");
        }
    }

    /// Security review finding 2: a netascii RRQ converted the whole file
    /// when it arrived (one 30-byte request for a 200 MB initrd: ~570 MB and
    /// seconds of a worker). Now the transfer shares the cached mapping, and
    /// each window is converted as it goes out.
    #[test]
    fn a_netascii_read_converts_block_by_block_and_copies_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let text: Vec<u8> = (0..20_000u32)
            .map(|i| match i % 7 {
                0 => b'\n',
                3 => b'\r',
                _ => b'a' + (i % 26) as u8,
            })
            .collect();
        std::fs::write(dir.path().join("notes.txt"), &text).unwrap();
        let s = service(dir.path(), 4);
        let peer: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let now = Instant::now();
        let mut request = Vec::new();
        packet::encode_rrq(
            "notes.txt",
            Mode::Netascii,
            &[("tsize", "0"), ("blksize", "1000"), ("windowsize", "4")],
            &mut request,
        );
        let Admission::Start(mut started) = s.handle_request(&request, peer, now) else {
            panic!("expected a transfer")
        };
        assert!(
            matches!(*started.data, FileData::Mapped(_)),
            "the transfer reads the cached mapping, not a converted copy"
        );
        // OACK without tsize (the converted length is not known yet).
        let Some(crate::proto::tftp::Transmit::Control(oack)) = started.transfer.poll_transmit()
        else {
            panic!("expected an OACK")
        };
        let Ok(Packet::Oack { options }) = Packet::parse(&oack) else {
            panic!("expected an OACK, got {oack:?}")
        };
        assert!(
            options.iter().all(|(name, _)| *name != "tsize"),
            "{options:?}"
        );
        let mut received = Vec::new();
        let mut acked = 0u16;
        for _ in 0..1000 {
            let mut ack = Vec::new();
            packet::encode_ack(acked, &mut ack);
            started.transfer.handle_datagram(&ack, now);
            if started.transfer.outcome().is_some() {
                break;
            }
            while let Some(transmit) = started.transfer.poll_transmit() {
                let crate::proto::tftp::Transmit::Control(datagram) = transmit else {
                    panic!("a netascii window goes out as ready datagrams")
                };
                let Ok(Packet::Data { block, payload }) = Packet::parse(&datagram) else {
                    panic!("expected DATA")
                };
                assert_eq!(block, acked.wrapping_add(1), "in order, no gap");
                received.extend_from_slice(payload);
                acked = block;
            }
        }
        assert!(matches!(
            started.transfer.outcome(),
            Some(Outcome::Complete)
        ));
        assert_eq!(received, netascii::encode(&text));
    }

    #[test]
    fn admission_of_requests() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ok"), b"hello").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("escape")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let s = service(dir.path(), 1);
        let peer: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let now = Instant::now();
        assert_eq!(
            error_code(&s.handle_request(&rrq("missing"), peer, now)),
            Some(1)
        );
        assert_eq!(
            error_code(&s.handle_request(&rrq("escape"), peer, now)),
            Some(2)
        );
        assert_eq!(
            error_code(&s.handle_request(&rrq("../ok"), peer, now)),
            Some(2)
        );
        assert_eq!(
            error_code(&s.handle_request(&rrq("sub"), peer, now)),
            Some(1)
        );
        assert_eq!(
            error_code(&s.handle_request(b"\x00\x09", peer, now)),
            Some(4)
        );
        assert_eq!(
            error_code(&s.handle_request(b"\x00\x04\x00\x01", peer, now)),
            Some(5)
        );
        assert!(matches!(
            s.handle_request(b"\x00\x05\x00\x00x\x00", peer, now),
            Admission::Ignore
        ));
        let mut wrq = Vec::new();
        packet::encode_wrq("ok", Mode::Octet, &[], &mut wrq);
        assert_eq!(error_code(&s.handle_request(&wrq, peer, now)), Some(2));

        let Admission::Start(first) = s.handle_request(&rrq("/ok"), peer, now) else {
            panic!("expected a transfer")
        };
        assert_eq!(&first.data[..], b"hello");
        // The same client port again: a retransmitted request, ignored.
        assert!(matches!(
            s.handle_request(&rrq("ok"), peer, now),
            Admission::Ignore
        ));
        // Per-client limit of one: a second port is refused, another client is not.
        let same_host: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        assert_eq!(
            error_code(&s.handle_request(&rrq("ok"), same_host, now)),
            Some(0)
        );
        let other: SocketAddr = "127.0.0.2:1000".parse().unwrap();
        assert!(matches!(
            s.handle_request(&rrq("ok"), other, now),
            Admission::Start(_)
        ));
        s.finish(&first, now);
        // Ended: the same port may start a new transfer at once, even while
        // the engine still holds the old one's memory.
        let Admission::Start(again) = s.handle_request(&rrq("ok"), peer, now) else {
            panic!("a new request from a finished transfer's port must start a transfer")
        };
        drop(first);
        s.finish(&again, now);
        drop(again);
        assert!(matches!(
            s.handle_request(&rrq("ok"), peer, now),
            Admission::Start(_)
        ));
        assert_eq!(s.stats().active, 0);
    }

    #[test]
    fn a_new_request_from_the_same_port_supersedes_a_transfer_the_client_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![1u8; 5000]).unwrap();
        let s = service(dir.path(), 8);
        let peer: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let now = Instant::now();
        let Admission::Start(mut old) = s.handle_request(&rrq("big"), peer, now) else {
            panic!("expected a transfer")
        };
        old.poll_transmit();
        // Nothing acknowledged yet: the same request again is a retransmission.
        assert!(matches!(
            s.handle_request(&rrq("big"), peer, now),
            Admission::Ignore
        ));
        // The client acknowledges block 1, then asks again from the same port:
        // it moved on, so a new transfer starts and the old one goes silent.
        old.handle_datagram(b"\x00\x04\x00\x01", now);
        let Admission::Start(new) = s.handle_request(&rrq("big"), peer, now) else {
            panic!("a request after progress must start a new transfer")
        };
        assert!(old.superseded());
        assert!(!new.superseded());
        s.finish(&old, now);
        drop(old);
        // The old transfer's end does not release the new one's port.
        assert!(matches!(
            s.handle_request(&rrq("big"), peer, now),
            Admission::Ignore
        ));
        assert_eq!(
            s.stats().failed,
            0,
            "a superseded transfer is not a failure"
        );
        drop(new);
    }

    #[test]
    fn generators_answer_before_the_disk() {
        struct Hello;
        impl FileGenerator for Hello {
            fn generate(&self, name: &str, client: SocketAddr) -> Option<Vec<u8>> {
                (name == "pxelinux.cfg/default")
                    .then(|| format!("for {}", client.ip()).into_bytes())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut s = service(dir.path(), 4);
        s.add_generator(Arc::new(Hello));
        let peer: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let Admission::Start(t) =
            s.handle_request(&rrq("pxelinux.cfg/default"), peer, Instant::now())
        else {
            panic!("expected a transfer")
        };
        assert_eq!(&t.data[..], b"for 127.0.0.1");
    }
}
